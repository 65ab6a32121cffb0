"""Draws imgs/architecture.png for the README: python imgs/architecture.py"""
from matplotlib.figure import Figure
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.patches import FancyBboxPatch

fig = Figure(figsize=(12, 6.6), dpi=110)
FigureCanvasAgg(fig)
ax = fig.add_axes([0, 0, 1, 1]); ax.set_xlim(0, 120); ax.set_ylim(0, 66); ax.axis("off")

def box(x, y, w, h, title, lines, color):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.6", fc=color, ec="#333", lw=1.2))
    ax.text(x + w / 2, y + h - 2.2, title, ha="center", va="top", fontsize=11.5, weight="bold")
    for i, line in enumerate(lines):
        ax.text(x + 1.5, y + h - 5.6 - 2.75 * i, line, ha="left", va="top", fontsize=9.2, family="monospace")

box(2, 7, 50, 53, "fl_server.py  (one asyncio event loop)", [
    "accept_loop      sock_accept; peek 1st byte:",
    "                 TLS or plain? (transport.py)",
    "handle_connection  <HELLO> [<CHALLENGE>/<AUTH>]",
    "                 admission -> <METADATA>",
    "serve_client     one task per client: reads",
    "                 every frame it sends",
    "receive_update   check -> recv_into pooled",
    "                 buffer -> fold into",
    "                 RunningAverage (fedavg.py)",
    "run_rounds       start_round: model encoded",
    "                 ONCE, same bytes to all",
    "                 wait: all in | dropped | timeout",
    "heartbeat_loop   <WAITING> every 10 s",
    "",
    "worker thread    evaluate round r while",
    "                 round r+1 trains; metrics.csv,",
    "                 checkpoint.fsck (atomic)",
], "#dbeafe")

for i, y in enumerate((46, 29, 12)):
    box(80, y, 36, 13, f"fl_client.py --client-id {i + 1 if i < 2 else 'N'}", [
        "blocking socket, FrameReader",
        "own partition (client_helper)",
        "train / evaluate (neural_net_helper)",
    ], "#dcfce7")

ax.text(98, 26.3, ". . .", ha="center", fontsize=14)
for y in (52.5, 35.5, 18.5 + 1.0):
    ax.annotate("", xy=(79, y + 1.2), xytext=(53.5, y + 1.2), arrowprops=dict(arrowstyle="->", lw=1.6, color="#1d4ed8"))
    ax.annotate("", xy=(53.5, y - 1.2), xytext=(79, y - 1.2), arrowprops=dict(arrowstyle="->", lw=1.6, color="#15803d"))
ax.text(66, 56.3, "<MODEL> + weights frame", ha="center", fontsize=9, color="#1d4ed8")
ax.text(66, 48.2, "<UPDATE> + weights frame", ha="center", fontsize=9, color="#15803d")
ax.text(66, 14, "every frame: 8-byte big-endian\nlength + payload; JSON control\nmessages; raw tensor bytes laid\nout by a JSON map; TCP or TLS",
        ha="center", va="top", fontsize=8.5, color="#444")
ax.text(60, 2.2, "socket_methods.py: the protocol, sans-IO (no sockets)   |   transport.py: the IO edges (asyncio BufferedProtocol / blocking socket)   |   security.py: TLS + HMAC",
        ha="center", fontsize=8.6, color="#333")
ax.text(60, 64, "fedsock: one server, N clients, one long-lived TCP connection each", ha="center", fontsize=13, weight="bold")
fig.savefig(__file__.replace(".py", ".png"))
