"""The evaluators of ns-eval, one small module each (docs/architecture.md).

`noisy_student.evaluation.evaluator` (EvalConfig, run_evaluation) is the only module that
imports them all; none of them imports `noisy_student.evaluation.evaluator`.
"""
