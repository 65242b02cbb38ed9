"""Prompt template files (plain text); see README.md here and `labelers.prompts`."""
