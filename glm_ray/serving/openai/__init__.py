"""OpenAI-compatible output parsing: reasoning split and GLM tool calls."""
