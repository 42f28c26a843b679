"""Networks: the backbones and GLMC's heads (backbones.py: `build_model`), the multi-expert networks of RIDE,
MDCS and SHIKE (experts.py: `build_expert_model`) and APA's activations (activations.py)."""
