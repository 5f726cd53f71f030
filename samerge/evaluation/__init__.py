"""Expert suites (tasks, fine-tuned experts, cached) and the evaluation and report every merge is judged by."""
