"""Terminal views: the Rich topology TUI and the chat TUI."""
