"""ReSuMe: Retriever-Summarizer Mutual Enhancement via reinforcement learning."""

__version__ = "0.1.0"
