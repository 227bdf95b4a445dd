"""The pure domain: aggregates and events. No I/O, no clock, no RNG, no HSM."""
