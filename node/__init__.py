"""kmsnet node: keystore, sessions, the CA role and the seed's KeyManagementSystem."""
