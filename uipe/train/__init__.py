"""Ray Train + FSDP2, split by process: `recipe` (prepare and unlearn, on the driver), `driver` (the TorchTrainer,
resources, run identities), `loop` (what every worker runs) with its parts `job`, `streams`, `sharding`, `export`.
Nothing is re-exported here, so a worker imports only what the loop needs."""
