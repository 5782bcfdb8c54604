//! Analytics against a real redis-server: how its figures are stored, kept and read back.

mod layout;
