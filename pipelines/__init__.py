"""graftline's orchestration: job specs, stages on Ray, Ray Train + DeepSpeed training, MLflow tracking."""
