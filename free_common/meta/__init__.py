"""Meta-learning: meta-learner, implicit gradient alignment, MAML replay, evaluation."""
