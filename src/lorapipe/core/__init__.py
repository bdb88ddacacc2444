"""The few helpers shared by stages. A stage imports from here, never from another stage."""
