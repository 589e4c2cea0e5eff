"""SpeechPrompt: adapt frozen speech models to new tasks by training only tiny per-task parameters."""

__version__ = "0.1.0"
