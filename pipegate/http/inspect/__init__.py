"""
The request inspector of the connector (C{--inspect ENDPOINT}).

L{recorder} keeps a bounded ring of what went through the tunnel (sans-IO); L{web}
serves it as a JSON API, a Server-Sent Events feed and a small page; L{replay} sends a
recorded request again straight to the local app.
"""
