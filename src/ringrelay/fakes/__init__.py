"""The project's own fake providers: real servers on loopback for tests, benchmarks and laptops."""
