"""Persona materials -> retrieval-augmented annotation -> persona dialogues and preference pairs."""
