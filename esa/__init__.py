"""ESA runner: Extreme Sensitivity Analysis of LLM weights."""
