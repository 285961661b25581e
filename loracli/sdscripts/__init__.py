"""sd-scripts interoperability: its option table, export to its files, and running it as a backend."""
