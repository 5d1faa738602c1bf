"""The admin side's pure cores: grading, access decisions, connection slots."""
