"""Development tooling that needs the source checkout: protobuf generation, the config-doc
renderer and the Apache Kafka launcher for tests and benchmarks. Not part of the installed package."""
