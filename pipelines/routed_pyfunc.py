"""The MLflow "models from code" file of a registered routed graft: MLflow runs this file to load the model.

`pipelines.logged_model` puts a copy of it in a routed graft's logged model, with the routed folder, its
base checkpoint and tokenizer as the model's artifacts and the `graft` package's source as its code.
`mlflow.pyfunc.load_model` (and so `mlflow models serve`) executes it; `set_model` at the bottom hands
MLflow the model object, built here rather than unpickled. It imports `graft`, transformers and MLflow
only, never `pipelines`, so it runs wherever the model's requirements are installed.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel, PythonModelContext


class RoutedGraft(PythonModel):
    """Greedy completions by a routed graft (`graft.routing.RoutedModel`), cut at the end of sequence."""

    def load_context(self, context: PythonModelContext) -> None:
        from transformers import AutoTokenizer

        from graft.routing import RoutedModel

        self.model = RoutedModel.load(context.artifacts["routed"], base=context.artifacts["base"])
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["tokenizer"])
        self.max_new_tokens = int(context.model_config["max_new_tokens"])

    def predict(self, context: PythonModelContext, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        """One completion per prompt. MLflow hands over a list of strings whatever the request held (a list, a
        string, a one-column DataFrame): it converts by this method's type hint."""
        from graft.evaluation import generate_answers

        n = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        return generate_answers(self.model, self.tokenizer, list(model_input), n)


mlflow.models.set_model(RoutedGraft())
