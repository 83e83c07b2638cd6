"""Discovery from a hand-written network config (exo classic's `exo.networking.manual`)."""
