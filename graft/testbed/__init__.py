"""The synthetic-skills testbed: a char tokenizer, skill generators and tiny model configs."""
