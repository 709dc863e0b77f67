"""Inference entry points over files: score facts (score_file) and answer a QA set (generate_file)."""
