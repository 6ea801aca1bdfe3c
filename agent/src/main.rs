//! `memoh-agent`: the daemon (`serve`) and the operator's CLI in one binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use memoh_agent::cli::{self, BotCmd, ImageCmd, McpCmd, NetCmd, SnapshotCmd};
use memoh_agent::config::Config;

/// Host agent for bot containers on containerd.
#[derive(Parser, Debug)]
#[command(name = "memoh-agent", version, about)]
struct Args {
    /// The agent's control socket (CLI commands).
    #[arg(
        long,
        global = true,
        env = "MEMOH_AGENT_SOCKET",
        default_value = "/run/memoh/agent.sock"
    )]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the daemon.
    Serve {
        /// TOML configuration (default /etc/memoh/agent.toml; missing means defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check the host (containerd, runc, CNI, iptables, cgroups, image, agent); non-zero exit
    /// when something is wrong.
    Doctor {
        /// TOML configuration (default /etc/memoh/agent.toml; missing means defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Manage bots.
    #[command(subcommand)]
    Bot(BotCmd),
    /// Run a command in a bot: `exec BOT -- CMD ARGS...`; `exec -t BOT -- sh` for an
    /// interactive terminal; `exec --detach BOT -- CMD` to start a process that outlives the
    /// call (prints its id; see `ps`, `attach`, `kill`, `wait`).
    Exec {
        /// Bot id.
        bot: String,
        /// Working directory inside the bot (default /data).
        #[arg(long, short = 'w')]
        workdir: Option<String>,
        /// Seconds before the command's process group is killed (0: the server's default,
        /// 30 s, or 300 s with --tty). A command that timed out or was killed by a signal exits
        /// 137, with one line on stderr saying which.
        #[arg(long, default_value_t = 0)]
        timeout: i32,
        /// Run the command on a terminal of its own, wired to this one (raw mode, window size
        /// and resizes passed on, stdout and stderr merged); stdin must be a terminal. With
        /// --detach: the process gets a terminal of its own, attached to nothing.
        #[arg(long, short = 't')]
        tty: bool,
        /// Start the command as a process of the bot that keeps running after this call, the
        /// agent's restart included; print its id alone on stdout. Its timeout is --timeout
        /// (0: none).
        #[arg(long, short = 'd')]
        detach: bool,
        /// With --detach: a label for `ps --tag`.
        #[arg(long, requires = "detach")]
        tag: Option<String>,
        /// With --detach: `KEY=VALUE` added to the environment (repeatable).
        #[arg(long, short = 'e', requires = "detach")]
        env: Vec<String>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// The processes of a bot started with `exec --detach`, live and finished.
    Ps {
        /// Bot id.
        bot: String,
        /// One JSON array of objects instead of the table.
        #[arg(long)]
        json: bool,
        /// Only processes with this tag.
        #[arg(long)]
        tag: Option<String>,
    },
    /// Print a process's output as it comes and end with its exit status (as `wait`); Ctrl-C
    /// detaches and leaves it running.
    Attach {
        /// Bot id.
        bot: String,
        /// Process id (from `exec --detach` or `ps`).
        id: String,
        /// Replay its output from the start instead of from now.
        #[arg(long)]
        from_start: bool,
    },
    /// Send a signal to a process's group.
    Kill {
        /// Bot id.
        bot: String,
        /// Process id.
        id: String,
        /// The signal: a name (TERM, SIGTERM) or a number (15).
        #[arg(long, short = 's', default_value = "TERM")]
        signal: String,
    },
    /// Wait for a process to end; exits with its code (128+N after signal N) and says which on
    /// stderr.
    Wait {
        /// Bot id.
        bot: String,
        /// Process id.
        id: String,
        /// Give up after this many seconds (exit 124); 0: wait as long as it runs.
        #[arg(long, default_value_t = 0)]
        timeout: u32,
    },
    /// Forget a finished process and delete its kept output.
    Rm {
        /// Bot id.
        bot: String,
        /// Process id.
        id: String,
    },
    /// Forward a local TCP port to a port inside a bot until Ctrl-C: `port-forward BOT
    /// LOCAL_PORT:BOT_PORT` (or `BOT_PORT` for the same port, `:BOT_PORT` for any free local
    /// one). Each connection is tunnelled to 127.0.0.1:BOT_PORT inside the bot.
    PortForward {
        /// Bot id.
        bot: String,
        /// `LOCAL_PORT:BOT_PORT`, `BOT_PORT` or `:BOT_PORT`.
        ports: String,
        /// Local address to listen on (default 127.0.0.1; another than loopback only when
        /// named here, and anyone who reaches it then reaches the bot's port).
        #[arg(long)]
        address: Option<String>,
    },
    /// Copy a file into or out of a bot: one side is `BOT:PATH`.
    Cp {
        /// Source.
        src: String,
        /// Destination.
        dst: String,
    },
    /// The bot server's own stdout and stderr.
    Logs {
        /// Bot id.
        bot: String,
        /// Keep printing as the log grows.
        #[arg(long, short)]
        follow: bool,
        /// Only the last N bytes.
        #[arg(long, default_value_t = 0)]
        tail: u64,
    },
    /// Manage images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Copy the bot's legacy bind-mounted data (`<data_root>/bots/BOT`) into it, once.
    Migrate {
        /// Bot id.
        bot: String,
    },
    /// Versions of a bot: create, list, roll back, remove.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Stdio MCP servers inside a bot: add, list, remove, logs.
    #[command(subcommand)]
    Mcp(McpCmd),
    /// The host's network: cleanup of what the agent left behind.
    #[command(subcommand)]
    Net(NetCmd),
}

fn main() -> ExitCode {
    // containerd's shim starts this binary as a bot's log program, with an argument list of its
    // own (see `logdriver`): handled before the CLI parser, which would refuse it.
    if let Some(settings) = memoh_agent::logdriver::from_shim() {
        return ExitCode::from(match settings {
            Ok(s) => memoh_agent::logdriver::run(&s),
            Err(e) => {
                eprintln!("memoh-agent: log program: {e}");
                memoh_agent::logdriver::discard()
            }
        });
    }
    let args = Args::parse();
    let is_daemon = matches!(args.cmd, Cmd::Serve { .. });
    let filter = tracing_subscriber::EnvFilter::try_from_env("MEMOH_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if is_daemon { "info" } else { "warn" })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // The daemon needs threads; a CLI call is one connection and starts faster without them.
    let built = if is_daemon {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("memoh-agent: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match rt.block_on(dispatch(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("memoh-agent: {}", e.message);
            e.code
        }
    };
    if is_daemon {
        return ExitCode::from(code);
    }
    // A CLI call is done: skip waiting for a stdin reader blocked in the background and the
    // runtime's teardown.
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::exit(i32::from(code));
}

async fn dispatch(args: Args) -> Result<u8, cli::CliError> {
    let socket = args.socket;
    match args.cmd {
        Cmd::Serve { config } => serve(config).await,
        Cmd::Doctor { config } => doctor(config).await,
        Cmd::Bot(c) => cli::bot(&socket, c).await,
        Cmd::Exec {
            bot,
            workdir,
            timeout,
            tty,
            detach: true,
            tag,
            env,
            argv,
        } => {
            let d = cli::Detached {
                argv,
                work_dir: workdir,
                env,
                tag,
                tty,
                timeout,
            };
            cli::exec_detach(&socket, &bot, d).await
        }
        Cmd::Exec {
            bot,
            workdir,
            timeout,
            tty: false,
            argv,
            ..
        } => cli::exec(&socket, &bot, &argv, workdir, timeout).await,
        Cmd::Exec {
            bot,
            workdir,
            timeout,
            tty: true,
            argv,
            ..
        } => cli::exec_tty(&socket, &bot, &argv, workdir, timeout).await,
        Cmd::Ps { bot, json, tag } => cli::ps(&socket, &bot, json, tag).await,
        Cmd::Attach {
            bot,
            id,
            from_start,
        } => cli::attach(&socket, &bot, &id, from_start).await,
        Cmd::Kill { bot, id, signal } => cli::kill(&socket, &bot, &id, &signal).await,
        Cmd::Wait { bot, id, timeout } => cli::wait(&socket, &bot, &id, timeout).await,
        Cmd::Rm { bot, id } => cli::rm(&socket, &bot, &id).await,
        Cmd::PortForward {
            bot,
            ports,
            address,
        } => cli::port_forward(&socket, &bot, &ports, address.as_deref()).await,
        Cmd::Cp { src, dst } => cli::cp(&socket, &src, &dst).await,
        Cmd::Logs { bot, follow, tail } => cli::logs(&socket, bot, follow, tail).await,
        Cmd::Image(c) => cli::image(&socket, c).await,
        Cmd::Snapshot(c) => cli::snapshot(&socket, c).await,
        Cmd::Migrate { bot } => cli::migrate(&socket, bot).await,
        Cmd::Mcp(c) => cli::mcp(&socket, c).await,
        Cmd::Net(c) => cli::net(&socket, c).await,
    }
}

async fn serve(config: Option<PathBuf>) -> Result<u8, cli::CliError> {
    let fail = |e: memoh_agent::AgentError| cli::CliError {
        message: e.to_string(),
        code: 1,
    };
    let cfg = Config::load(config.as_deref()).map_err(fail)?;
    let listener = memoh_agent::daemon::bind_control(&cfg).map_err(fail)?;
    memoh_agent::daemon::run(cfg, listener, shutdown_signal())
        .await
        .map_err(fail)?;
    Ok(0)
}

async fn doctor(config: Option<PathBuf>) -> Result<u8, cli::CliError> {
    use memoh_agent::doctor;
    let cfg = Config::load(config.as_deref()).map_err(|e| cli::CliError {
        message: e.to_string(),
        code: 1,
    })?;
    let path = config.unwrap_or_else(|| memoh_agent::config::DEFAULT_CONFIG_PATH.into());
    let checks = doctor::run_checks(&cfg, &path.display().to_string(), &doctor::RealHost).await;
    print!("{}", doctor::render(&checks));
    Ok(doctor::exit_code(&checks))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down; bots keep running");
}
