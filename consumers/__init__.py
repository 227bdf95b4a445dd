"""Log followers and Kafka: audit relay, record views, test broker.

The ``kafka`` package is imported only inside this package.
"""
