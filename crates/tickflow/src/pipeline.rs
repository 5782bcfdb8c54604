//! The running pipeline the operator commands look at: its Redis, its key space and its
//! stages, named by the same variables every service reads (`REDIS_URL`,
//! `TICKFLOW_NAMESPACE`, `TICKFLOW_PARTITIONS`, `INGEST_STREAMS`) or by flags that override
//! them. The commands talk to Redis only, so they work with every service down.

use anyhow::{Context, bail};
use clap::Args;
use streams_core::{
    Config, ConsumeMode, Env, InputFormat, Inputs, KeySpace, Redis, StageSpec,
    connection::Connection,
    inspect::{StageInput, stage_inputs},
};
use tickflow_proto::topology;

/// Where the pipeline is: flags that default to the services' variables.
#[derive(Debug, Clone, Default, Args)]
pub struct PipelineArgs {
    /// The pipeline's Redis: redis://[user:pass@]host:port[/db], or rediss:// for TLS
    /// [default: redis://127.0.0.1:6379]; with TICKFLOW_REDIS_MODE=cluster, a
    /// comma-separated list of the cluster's seed nodes.
    #[arg(long, env = "REDIS_URL", hide_env_values = true, value_name = "URL")]
    pub redis_url: Option<String>,
    /// The pipeline's key prefix [default: tickflow].
    #[arg(long, env = "TICKFLOW_NAMESPACE", value_name = "NAME")]
    pub namespace: Option<String>,
    /// How many partitions each stream has [default: 16].
    #[arg(long, env = "TICKFLOW_PARTITIONS", value_name = "N")]
    pub partitions: Option<String>,
}

impl PipelineArgs {
    /// The variables as a service would see them: the process environment, with the
    /// flags given here in place of their variables.
    pub fn env(&self) -> Env {
        let overrides = [
            ("REDIS_URL", &self.redis_url),
            ("TICKFLOW_NAMESPACE", &self.namespace),
            ("TICKFLOW_PARTITIONS", &self.partitions),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name.to_owned(), value.clone()?)));
        // Later pairs win: a flag replaces its variable.
        Env::from_pairs(std::env::vars().chain(overrides))
    }

    /// Reads the configuration (with the services' checks and error messages) and
    /// prepares a connection; connects lazily.
    pub fn pipeline(&self) -> anyhow::Result<Pipeline> {
        Pipeline::from_env(&self.env())
    }
}

/// One stage of the pipeline, as the operator commands see it.
#[derive(Debug, Clone)]
pub struct Stage {
    /// Its spec: consumer group, inputs, mode.
    pub spec: StageSpec,
    /// What it reads, per partition (or per external stream), with the dead letters and
    /// leases that go with each.
    pub inputs: Vec<StageInput>,
}

impl Stage {
    /// The stage's name: its consumer group.
    pub fn name(&self) -> &str {
        &self.spec.group
    }

    /// What it reads, as the commands name it: the logical stream, or the external
    /// streams' keys.
    pub fn input_name(&self) -> String {
        match &self.spec.inputs {
            Inputs::Partitioned(logical) => logical.clone(),
            Inputs::External(keys) => keys.join(","),
        }
    }

    /// The inputs of `partition` (every input when `None`); an error names the valid ones.
    pub fn inputs_of(&self, partition: Option<u32>) -> anyhow::Result<Vec<&StageInput>> {
        let inputs: Vec<&StageInput> = self
            .inputs
            .iter()
            .filter(|i| partition.is_none_or(|p| i.partition == p))
            .collect();
        if inputs.is_empty() {
            bail!(
                "stage {} has no partition {}: its partitions are 0..{}",
                self.name(),
                partition.unwrap_or_default(),
                self.inputs.len()
            );
        }
        Ok(inputs)
    }
}

/// The pipeline's Redis, keys and stages.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The shared configuration, as the services read it.
    pub config: Config,
    /// A handle on its Redis (a small pool; connects lazily).
    pub redis: Redis,
    /// Its stages, in pipeline order: ingest's external streams (unless INGEST_STREAMS
    /// is `-`), transform, engine, analytics.
    pub stages: Vec<Stage>,
}

impl Pipeline {
    /// The pipeline `env` names.
    pub fn from_env(env: &Env) -> anyhow::Result<Self> {
        let config = Config::from_env(env, "127.0.0.1:0")?;
        let ingest = ingest::IngestConfig::from_env(env)?;
        let redis = Redis::from_config(&config)?;
        let mut specs = Vec::new();
        if !ingest.external_streams.is_empty() {
            // As ingest builds it (services/ingest/src/lib.rs, `run`).
            specs.push(StageSpec {
                group: topology::INGEST_GROUP.into(),
                inputs: Inputs::External(ingest.external_streams),
                mode: ConsumeMode::Shared,
                format: InputFormat::Raw,
            });
        }
        specs.extend([transform::spec(), engine::spec(), analytics::spec()]);
        let stages = specs
            .into_iter()
            .map(|spec| Stage {
                inputs: stage_inputs(&spec, &config.keys),
                spec,
            })
            .collect();
        Ok(Self {
            config,
            redis,
            stages,
        })
    }

    /// The key space.
    pub fn keys(&self) -> &KeySpace {
        &self.config.keys
    }

    /// The stage named `name` (its consumer group); an error lists the stages.
    pub fn stage(&self, name: &str) -> anyhow::Result<&Stage> {
        self.stages
            .iter()
            .find(|s| s.name() == name)
            .with_context(|| {
                format!(
                    "no stage {name:?}; the stages are {}",
                    self.stage_names().join(", ")
                )
            })
    }

    /// The stages' names, in pipeline order.
    pub fn stage_names(&self) -> Vec<&str> {
        self.stages.iter().map(Stage::name).collect()
    }

    /// A connection for the commands, checked with a `PING`: the pool's, or on a Redis
    /// Cluster (`TICKFLOW_REDIS_MODE=cluster`) the cluster connection, which sends each
    /// command to the master of its key's slot. A command that touches several partitions
    /// sends one request per key (`query_each`), never one pipeline or script across slots.
    pub async fn connection(&self) -> anyhow::Result<Connection> {
        let context = || {
            format!(
                "connecting to {} (REDIS_URL or --redis-url, TICKFLOW_REDIS_MODE)",
                self.redis.display_url()
            )
        };
        self.redis
            .ping(streams_core::connection::CONNECT_TIMEOUT * 2)
            .await
            .with_context(context)?;
        Ok(self.redis.pooled().await.with_context(context)?.clone())
    }

    /// A connection of its own for blocking reads of `block` over several streams at once
    /// (`tail --follow`), on a single Redis; `None` on a Redis Cluster, where streams of
    /// several slots cannot be read by one command.
    pub async fn blocking_connection(
        &self,
        block: std::time::Duration,
    ) -> anyhow::Result<Option<redis::aio::MultiplexedConnection>> {
        if self.redis.is_cluster() {
            return Ok(None);
        }
        let conn = self.redis.dedicated(block).await.with_context(|| {
            format!(
                "connecting to {} (REDIS_URL or --redis-url)",
                self.redis.display_url()
            )
        })?;
        Ok(Some(conn))
    }
}

/// Redis's clock, ms since the Unix epoch (ages are measured against it, so that the
/// reader's clock does not matter). On a cluster, one node's.
pub async fn redis_now_ms(conn: &mut Connection) -> anyhow::Result<u64> {
    let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    Ok(seconds * 1000 + micros / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_variables_and_bad_values_name_them() {
        let args = PipelineArgs {
            namespace: Some("other".into()),
            partitions: Some("4".into()),
            ..PipelineArgs::default()
        };
        let pipeline = args.pipeline().unwrap();
        assert_eq!(pipeline.keys(), &KeySpace::new("other", 4));
        let engine = pipeline.stage("engine").unwrap();
        assert_eq!(engine.inputs.len(), 4);
        assert_eq!(engine.inputs[3].stream, "other:{3}:s:validated");
        assert!(
            pipeline
                .stage("enigne")
                .unwrap_err()
                .to_string()
                .contains("transform, engine, analytics")
        );
        let bad = PipelineArgs {
            partitions: Some("zero".into()),
            ..PipelineArgs::default()
        };
        assert!(
            bad.pipeline()
                .unwrap_err()
                .to_string()
                .contains("TICKFLOW_PARTITIONS")
        );
    }
}
