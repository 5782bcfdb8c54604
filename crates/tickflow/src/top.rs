//! `tickflow top`: a live view of the pipeline, refreshed every second — per stage
//! throughput, lag, pending, dead letters and consumers, the end-to-end latency from
//! analytics' histogram, and sparklines of both. `q` quits. It fits an 80×24 terminal and
//! uses no colour when `NO_COLOR` is set (emphasis is then bold or a `>` marker).
//!
//! Everything it shows comes from Redis ([`crate::snapshot`] and analytics'
//! [`AnalyticsKeys::latency_histogram`]), so it works with every service down.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

use analytics::aggregate::AnalyticsKeys;
use clap::Args;
use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::{
    Frame,
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Cell, Paragraph, Row, Sparkline, Table},
};

use crate::{
    format::{age, colour_on_stdout},
    pipeline::PipelineArgs,
    snapshot::{self, Snapshot},
};

/// How many refreshes the sparklines remember.
const HISTORY: usize = 120;

/// `tickflow top`'s options.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:
  tickflow top
  tickflow top --interval-ms 500
  NO_COLOR=1 tickflow top

Keys: q, Esc or Ctrl-C quits. IN/S is what each stage read per second (from its group's
entries-read counter); latency is origin → analytics over the last refresh, from
analytics' histogram.")]
pub struct TopArgs {
    /// The pipeline.
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// How often to refresh, in ms.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub interval_ms: u64,
}

/// What the view shows, kept across refreshes.
#[derive(Debug, Default)]
pub struct View {
    /// The latest snapshot.
    pub snapshot: Option<Snapshot>,
    /// Each stage's events read per second over the last refresh.
    pub throughput: BTreeMap<String, f64>,
    /// Analytics' throughput, one value per refresh (oldest first).
    pub throughput_history: VecDeque<u64>,
    /// p99 latency in µs over each refresh (0 when nothing arrived).
    pub p99_history: VecDeque<u64>,
    /// The latency over the last refresh.
    pub window: Option<analytics::latency::Percentiles>,
    /// The latency over everything analytics has counted.
    pub all_time: Option<analytics::latency::Percentiles>,
    /// The last error reading Redis, shown until a refresh succeeds.
    pub error: Option<String>,
    previous: Option<Reading>,
}

impl View {
    /// Takes in a new reading at `now`.
    pub fn update(&mut self, now: Instant, snapshot: Snapshot, histogram: BTreeMap<u64, u64>) {
        let read: BTreeMap<String, u64> = snapshot
            .stages
            .iter()
            .map(|s| (s.stage.clone(), s.totals.entries_read))
            .collect();
        if let Some((then, read_then, histogram_then)) = &self.previous {
            let seconds = now.duration_since(*then).as_secs_f64().max(1e-3);
            self.throughput = read
                .iter()
                .map(|(stage, count)| {
                    let before = read_then.get(stage).copied().unwrap_or(*count);
                    (stage.clone(), count.saturating_sub(before) as f64 / seconds)
                })
                .collect();
            let window: Vec<(u64, u64)> = histogram
                .iter()
                .map(|(bucket, count)| {
                    let before = histogram_then.get(bucket).copied().unwrap_or(0);
                    (*bucket, count.saturating_sub(before))
                })
                .collect();
            let window = analytics::latency::percentiles(&window);
            push(&mut self.p99_history, window.p99_us);
            push(
                &mut self.throughput_history,
                self.throughput
                    .get(tickflow_proto::topology::ANALYTICS_GROUP)
                    .copied()
                    .unwrap_or(0.0)
                    .round() as u64,
            );
            self.window = Some(window);
        }
        let all: Vec<(u64, u64)> = histogram.iter().map(|(b, c)| (*b, *c)).collect();
        self.all_time = Some(analytics::latency::percentiles(&all));
        self.previous = Some((now, read, histogram));
        self.snapshot = Some(snapshot);
        self.error = None;
    }
}

/// When a refresh was read, each stage's entries read, and analytics' histogram then.
type Reading = (Instant, BTreeMap<String, u64>, BTreeMap<u64, u64>);

fn push(history: &mut VecDeque<u64>, value: u64) {
    if history.len() == HISTORY {
        history.pop_front();
    }
    history.push_back(value);
}

/// Runs the live view until `q`.
pub async fn run(args: TopArgs) -> anyhow::Result<()> {
    let pipeline = args.pipeline.pipeline()?;
    let mut conn = pipeline.connection().await?;
    let latency = AnalyticsKeys::new(pipeline.keys().clone());
    let colour = colour_on_stdout();
    let interval = Duration::from_millis(args.interval_ms);

    // Keys are read on a thread of their own (crossterm's reads block) and sent here.
    let (keys_tx, mut keys_rx) = tokio::sync::mpsc::channel::<()>(1);
    let reader = std::thread::spawn(move || {
        loop {
            if keys_tx.is_closed() {
                return;
            }
            if !event::poll(Duration::from_millis(100)).unwrap_or(false) {
                continue;
            }
            if let Ok(Event::Key(key)) = event::read()
                && key.kind == KeyEventKind::Press
                && (matches!(key.code, KeyCode::Char('q') | KeyCode::Esc)
                    || (key.code == KeyCode::Char('c')
                        && key.modifiers.contains(KeyModifiers::CONTROL)))
            {
                let _ = keys_tx.blocking_send(());
                return;
            }
        }
    });

    let mut terminal = ratatui::try_init()?;
    let mut view = View::default();
    let outcome = async {
        let mut ticks = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = keys_rx.recv() => return Ok::<_, anyhow::Error>(()),
            }
            let reading = async {
                let snapshot = snapshot::take(&pipeline, &mut conn, None).await?;
                let histogram = latency.latency_histogram(&mut conn).await?;
                Ok::<_, anyhow::Error>((snapshot, histogram))
            };
            match reading.await {
                Ok((snapshot, histogram)) => view.update(Instant::now(), snapshot, histogram),
                Err(e) => view.error = Some(format!("{e:#}")),
            }
            terminal.draw(|frame| draw(frame, &view, colour))?;
        }
    }
    .await;
    ratatui::restore();
    drop(keys_rx);
    let _ = reader.join();
    outcome
}

/// Draws the view.
pub fn draw(frame: &mut Frame<'_>, view: &View, colour: bool) {
    let style = |color: Color| {
        if colour {
            Style::default().fg(color)
        } else {
            Style::default()
        }
    };
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let [stages_area, latency_area, sparks_area, footer] = Layout::vertical([
        Constraint::Length(8),
        Constraint::Length(4),
        Constraint::Min(4),
        Constraint::Length(1),
    ])
    .areas(frame.area());

    let title = match &view.snapshot {
        Some(s) => format!(
            " tickflow top: {} ({} partitions) ",
            s.namespace, s.partitions
        ),
        None => " tickflow top: reading… ".to_owned(),
    };
    let header = Row::new(
        [
            "STAGE",
            "IN/S",
            "LAG",
            "PENDING",
            "DLQ",
            "CONSUMERS",
            "OLDEST",
            "SLOWEST",
        ]
        .map(|h| Cell::from(h).style(bold)),
    );
    let mut rows = Vec::new();
    if let Some(snapshot) = &view.snapshot {
        for stage in &snapshot.stages {
            let t = &stage.totals;
            let behind = t.backlog > 0;
            let lag = if t.lag_unknown_partitions > 0 {
                format!("{}+?", t.lag)
            } else {
                t.lag.to_string()
            };
            let oldest = stage
                .partitions
                .iter()
                .filter_map(|p| p.oldest_pending_age_ms)
                .max()
                .map_or("-".to_owned(), age);
            let live = stage
                .consumers
                .iter()
                .filter(|c| c.idle_ms < 60_000)
                .count();
            let name = if behind {
                format!(">{}", stage.stage)
            } else {
                format!(" {}", stage.stage)
            };
            let row_style = if behind {
                style(Color::Yellow)
            } else {
                Style::default()
            };
            rows.push(
                Row::new([
                    Cell::from(name),
                    Cell::from(format!(
                        "{:.0}",
                        view.throughput.get(&stage.stage).copied().unwrap_or(0.0)
                    )),
                    Cell::from(lag),
                    Cell::from(t.pending.to_string()),
                    Cell::from(t.dead_letters.to_string()).style(if t.dead_letters > 0 {
                        style(Color::Red)
                    } else {
                        Style::default()
                    }),
                    Cell::from(format!("{live}/{}", stage.consumers.len())),
                    Cell::from(oldest),
                    Cell::from(
                        stage
                            .slowest_partition
                            .map_or("-".to_owned(), |p| format!("p{p}")),
                    ),
                ])
                .style(row_style),
            );
        }
    }
    let table = Table::new(
        rows,
        [
            Constraint::Length(11),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Length(8),
            Constraint::Length(6),
            Constraint::Length(10),
            Constraint::Length(7),
            Constraint::Length(7),
        ],
    )
    .header(header)
    .block(Block::bordered().title(Span::styled(title, bold)));
    frame.render_widget(table, stages_area);

    let micros = |us: u64| {
        if us >= 1000 {
            format!("{:.1}ms", us as f64 / 1000.0)
        } else {
            format!("{us}µs")
        }
    };
    let mut lines = Vec::new();
    match &view.window {
        Some(w) if w.count > 0 => lines.push(Line::from(vec![
            Span::styled("last refresh  ", bold),
            Span::raw(format!(
                "p50 {}  p99 {}  p999 {}  ({} events)",
                micros(w.p50_us),
                micros(w.p99_us),
                micros(w.p999_us),
                w.count
            )),
        ])),
        Some(_) => lines.push(Line::from(vec![
            Span::styled("last refresh  ", bold),
            Span::raw("no events"),
        ])),
        None => lines.push(Line::raw("last refresh  (after the next refresh)")),
    }
    if let Some(all) = &view.all_time {
        lines.push(Line::from(vec![
            Span::styled("all time      ", bold),
            Span::raw(format!(
                "p50 {}  p99 {}  p999 {}  ({} events)",
                micros(all.p50_us),
                micros(all.p99_us),
                micros(all.p999_us),
                all.count
            )),
        ]));
    }
    frame.render_widget(
        Paragraph::new(lines)
            .block(Block::bordered().title(" end-to-end latency (origin → analytics) ")),
        latency_area,
    );

    let [throughput_area, p99_area] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)])
            .areas(sparks_area);
    let spark = |history: &VecDeque<u64>, width: u16| -> Vec<u64> {
        // The most recent values that fit, newest on the right.
        let width = width.saturating_sub(2) as usize;
        history
            .iter()
            .skip(history.len().saturating_sub(width))
            .copied()
            .collect()
    };
    frame.render_widget(
        Sparkline::default()
            .block(Block::bordered().title(format!(
                " analytics events/s (max {}) ",
                view.throughput_history.iter().max().copied().unwrap_or(0)
            )))
            .data(spark(&view.throughput_history, throughput_area.width))
            .style(style(Color::Green)),
        throughput_area,
    );
    frame.render_widget(
        Sparkline::default()
            .block(Block::bordered().title(format!(
                " p99 latency (max {}) ",
                micros(view.p99_history.iter().max().copied().unwrap_or(0))
            )))
            .data(spark(&view.p99_history, p99_area.width))
            .style(style(Color::Cyan)),
        p99_area,
    );

    let footer_text = match &view.error {
        Some(e) => Line::styled(
            format!("redis: {e}"),
            style(Color::Red).add_modifier(Modifier::BOLD),
        ),
        None => {
            Line::raw("q quits · > marks a stage with a backlog · tickflow status for partitions")
        }
    };
    frame.render_widget(Paragraph::new(footer_text), footer);
}
