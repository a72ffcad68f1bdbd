"""Training: data loading, the run itself and its artifacts. Knows nothing about MQTT."""
