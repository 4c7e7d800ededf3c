"""Folder tools that are not pipeline stages: `wsss predict` and `wsss crf`."""
