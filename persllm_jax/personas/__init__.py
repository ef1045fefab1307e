"""Personas: reading and validating a personas directory (a persona, its stages and their stage
tokens, and the knowledge, experiences and speech records of each stage), and the system prompt
a personified model is given. Plain Python; used by data building, chat, talk and evaluation."""
