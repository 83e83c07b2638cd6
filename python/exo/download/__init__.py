"""Model downloads: the shard downloader interface, progress events and the Hugging Face downloader."""
