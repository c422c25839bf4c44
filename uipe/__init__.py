"""uipe: UIPE unlearning (theta = theta_un + alpha * (theta_un - theta_ini)) as a distributed hyper-parameter service."""

__version__ = "0.1.0"
