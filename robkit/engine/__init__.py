"""The training engine: recipes, tasks, the trainer and their building blocks."""
