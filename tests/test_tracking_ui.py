"""What the MLflow UI opens on: an experiment graftline creates is a training one (not MLflow 3's GenAI view); an
experiment someone else made is left as it is."""

from mlflow import MlflowClient

from pipelines.tracking import Tracker


def test_a_new_experiment_opens_on_training_runs_and_an_existing_one_is_untouched(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(uri, "graftline-made", artifact_root=tmp_path / "art")
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("graftline-made").tags["mlflow.experimentKind"] == "finetuning"
    client.create_experiment("theirs", tags={"mlflow.experimentKind": "genai_development"})
    Tracker(uri, "theirs")
    assert client.get_experiment_by_name("theirs").tags["mlflow.experimentKind"] == "genai_development"
