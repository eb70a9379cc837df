"""agent-tiny's world: its tools, the procedural task generator, the trainer and the evaluation that drives the
runtime ``Agent``. The weights, config and tokenizer it ships live in ``models/agent_tiny/`` (a model folder the
registry loads like any other)."""
