//! The engine stage against a real redis-server: how its books are stored and read back.

mod layout;
