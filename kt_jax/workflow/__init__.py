"""`kt-jax run`: the KnowTuning stage graph over the library, resumable stage by stage in one run directory."""
