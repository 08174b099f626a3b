"""loadmeter: electrical load readings from MQTT into time-series storage."""

__version__ = "0.1.0"
