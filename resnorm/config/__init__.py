"""The configuration: the schema of every key (:mod:`resnorm.config.schema`), the variant records
(:mod:`resnorm.config.variants`), the checks (:mod:`resnorm.config.rules`) and composing a command line
into a config (:mod:`resnorm.config.compose`). Imports nothing of resnorm's later stages, and no torch."""
