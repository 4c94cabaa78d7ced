"""Data layer: LLaVA-format records, conversation template, collator, tasks, DataModule, demo."""
