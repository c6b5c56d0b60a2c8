"""lit_moral: moral alignment of LLM agents with PPO + LoRA on the Iterated Prisoner's Dilemma."""

__version__ = "0.1.0"
