"""Grounding DINO for FiLo's HQ-Loc: `hqloc` (the released localisation rules, pure functions), `detector`
(the transformers model, its loading and batching), `convert_to_hf` + `convert_rules` (the authors'
checkpoints to transformers' layout; never imported by the other two)."""
