"""The declared fleet (inventory YAML) and its merge with the agents actually seen."""
