"""Stage runners: each turns the resolved config into one step of the recipe.

``pretrain`` -> ``sft`` -> ``label`` -> ``rm`` -> ``ppo``/``ppo_ptx`` -> ``eval``; ``pipeline``
runs them in order, reusing every output that already exists for the same config.
"""
