"""The output folder: atomic files, the journal and its lock, the model card, publishing to the Hub."""
