//! How the operator commands write for people: ages, times, numbers, and colour only
//! where it helps (a terminal, and `NO_COLOR` unset: https://no-color.org).

use std::io::{IsTerminal, Write};

/// Prints `text` and a newline on stdout. When stdout is closed (`tickflow tail | head`),
/// the process ends quietly with status 0, as command-line tools do, instead of
/// panicking as `println!` would.
pub fn line(text: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{text}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("tickflow: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// A duration in ms as a short age: `850ms`, `12.3s`, `5m03s`, `2h05m`, `3d04h`.
pub fn age(ms: u64) -> String {
    let seconds = ms / 1000;
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        3_600_000..86_400_000 => format!("{}h{:02}m", seconds / 3600, seconds / 60 % 60),
        _ => format!("{}d{:02}h", seconds / 86_400, seconds / 3600 % 24),
    }
}

/// µs since the Unix epoch as an RFC 3339 time (UTC, ms precision).
pub fn time_us(us: u64) -> String {
    jiff::Timestamp::from_microsecond(us as i64)
        .map_or_else(|_| format!("{us}µs"), |t| format!("{:.3}", t))
}

/// Whether colour may be used on stdout: a terminal, and `NO_COLOR` unset or empty.
pub fn colour_on_stdout() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Writes emphasis as ANSI codes, or as nothing when colour is off (the text itself then
/// carries the meaning, e.g. a `>` marker).
#[derive(Debug, Clone, Copy)]
pub struct Paint {
    /// Whether to emit ANSI codes.
    pub colour: bool,
}

impl Paint {
    /// For stdout.
    pub fn stdout() -> Self {
        Self {
            colour: colour_on_stdout(),
        }
    }

    /// `text` in bold.
    pub fn bold(self, text: &str) -> String {
        self.code("1", text)
    }

    /// `text` in bold yellow: a warning.
    pub fn warn(self, text: &str) -> String {
        self.code("1;33", text)
    }

    /// `text` dimmed.
    pub fn dim(self, text: &str) -> String {
        self.code("2", text)
    }

    fn code(self, code: &str, text: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_times_read_well() {
        assert_eq!(age(850), "850ms");
        assert_eq!(age(12_345), "12.3s");
        assert_eq!(age(303_000), "5m03s");
        assert_eq!(age(7_500_000), "2h05m");
        assert_eq!(age(273_600_000), "3d04h");
        assert_eq!(time_us(1_700_000_000_123_456), "2023-11-14T22:13:20.123Z");
        assert_eq!(Paint { colour: false }.warn("x"), "x");
        assert_eq!(Paint { colour: true }.bold("x"), "\x1b[1mx\x1b[0m");
    }
}
