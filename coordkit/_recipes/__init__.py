"""The recipes, each written once above the Session and Backend layers; one module per recipe."""
