"""Post-hoc explainers (Captum adapters) and faithfulness metrics, for any model of the zoo."""
