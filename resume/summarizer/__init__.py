"""The LLM summarizer: prompts, generation, parsing, and the GRPO objective."""
