"""Draws imgs/architecture.png for the README: python imgs/architecture.py

The layout in layers: a file imports only from the layers below it (tests/test_layout.py
checks that nothing in fedsock/ imports a script and that there is no import cycle).
The numbered arrows follow one round.
"""
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

fig = Figure(figsize=(13, 8.4), dpi=110)
FigureCanvasAgg(fig)
ax = fig.add_axes([0, 0, 1, 1])
ax.set_xlim(0, 130)
ax.set_ylim(0, 86)
ax.axis("off")

def row(y, label, colour, rooms):
    """Rooms of equal width side by side between x = 4 and x = 126."""
    width = (122 - 1.6 * (len(rooms) - 1)) / len(rooms)
    return y, label, colour, [(4 + i * (width + 1.6), width, name, what) for i, (name, what) in enumerate(rooms)]


LAYERS = [
    row(69, "what users run", "#fde68a", [
        ("fl_server.py", "flags -> run_server"), ("fl_client.py", "flags -> run_client"),
        ("fl_simulate.py", "flags -> simulate"), ("demo.py", "a server and its clients")]),
    row(53, "fedsock/: the run", "#dbeafe", [
        ("server.py", "listen, lobby,\nobservers, signals"), ("engine.py", "RoundEngine.fit_round,\nRound.collect"),
        ("run_control.py", "lobby phase,\nsessions, stop"), ("reports.py", "rows, evaluation,\ncheckpoint"),
        ("prepare.py", "data, model,\nstrategy, DP"), ("client.py", "join and answer;\nlocal_training.py")]),
    row(37, "fedsock/: the seams and the maths", "#dcfce7", [
        ("clients.py", "ClientProxy,\nClientPool"), ("lobby.py", "RemoteClient:\na proxy on a socket"),
        ("simulate.py", "VirtualClient:\na proxy in-process"), ("strategies.py", "aggregate,\nStrategy.step"),
        ("secagg.py", "masks, Shamir;\nprivacy.py: DP"), ("events.py", "Console; run_files,\ndashboard observe")]),
    row(21, "fedsock/: the protocol's edges", "#ede9fe", [
        ("order.py", "one table: which message\nmay come when"), ("transport.py", "the IO: asyncio and\nblocking sockets"),
        ("security.py", "TLS, tokens;\ncompression.py")]),
    row(5, "the card's modules, and the ground everything stands on", "#fee2e2", [
        ("socket_methods.py", "wire, sans-IO:\nframes, MESSAGES"), ("client_helper.py", "datasets,\npartitions"),
        ("neural_net_helper.py", "models,\nlocal_round"), ("config.py", "settings;\nconsole.py: errors")]),
]
centres = {}
for y, label, colour, rooms in LAYERS:
    ax.text(4, y + 10.6, label, fontsize=9, color="#555", style="italic")
    for x, w, name, what in rooms:
        ax.add_patch(FancyBboxPatch((x, y), w, 9.5, boxstyle="round,pad=0.4", fc=colour, ec="#444", lw=1.0))
        ax.text(x + w / 2, y + 7.6, name, ha="center", va="top", fontsize=9.5, weight="bold", family="monospace")
        ax.text(x + w / 2, y + 3.6, what, ha="center", va="center", fontsize=8.2)
        centres[name] = (x + w / 2, y + 4.75, w)


def arrow(src: str, dst: str, number: int, dx_src: float = 0, dx_dst: float = 0, colour: str = "#1d4ed8") -> None:
    """From one room's edge to another's; within a row, over the top."""
    (x1, y1, _), (x2, y2, _) = centres[src], centres[dst]
    x1, x2 = x1 + dx_src, x2 + dx_dst
    if y1 == y2:
        y1 = y2 = y1 + 5.4
        style = "arc3,rad=-0.25"
    else:
        y1, y2 = (y1 - 5.4, y2 + 5.4) if y2 < y1 else (y1 + 5.4, y2 - 5.4)
        style = "arc3,rad=0.06"
    ax.annotate("", xy=(x2, y2), xytext=(x1, y1), arrowprops=dict(arrowstyle="-|>", lw=1.5, color=colour,
                                                                  shrinkA=1, shrinkB=1, connectionstyle=style))
    mid_y = (y1 + y2) / 2 + (4.5 if y1 == y2 else 0)
    ax.text((x1 + x2) / 2, mid_y, str(number), fontsize=9, weight="bold", color="white", ha="center", va="center",
            bbox=dict(boxstyle="circle,pad=0.18", fc=colour, ec="none"))


arrow("fl_server.py", "server.py", 1, dx_src=-3)
arrow("server.py", "engine.py", 2)
arrow("engine.py", "strategies.py", 3, dx_src=6, dx_dst=-4)  # sample
arrow("engine.py", "lobby.py", 4, dx_src=-2, dx_dst=-2)  # send: RemoteClient.fit
arrow("lobby.py", "client.py", 5, dx_src=8, dx_dst=-6, colour="#15803d")  # <MODEL> over TCP; <UPDATE> back
arrow("client.py", "neural_net_helper.py", 6, dx_src=4, dx_dst=12, colour="#15803d")  # local_round
arrow("lobby.py", "engine.py", 7, dx_src=3, dx_dst=3)  # collect: Round.fold
arrow("engine.py", "reports.py", 8, dx_src=8)  # step, report

ax.text(65, 82.6, "fedsock: one round through the code", ha="center", fontsize=13, weight="bold")
ax.text(65, 1.2, "1 main  2 RoundEngine.run  3 Strategy.sample  4 RemoteClient.fit frames <MODEL>  5 over TCP to run_client  "
                 "6 LocalTrainer.fit  7 receive_update, Round.collect  8 Strategy.step, RoundReports", ha="center",
        fontsize=8.4, color="#333")
fig.savefig(__file__.replace(".py", ".png"))
