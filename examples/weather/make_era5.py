#!/usr/bin/python3
"""Write an ERA5-like NetCDF file from an analytic atmosphere plus noise: the 84 inputs of the
D-CHAG paper's weather model, under ClimaX's names, on a regular latitude/longitude grid.

    /usr/bin/python3 examples/weather/make_era5.py era5.nc [--lat 32] [--lon 64] [--times 4]
        [--step-hours 6] [--start-hour 0] [--noise 1.0] [--seed 0] [--omit NAME]...

Variables, each float32 (time, latitude, longitude) with CF units:
  surface     2m_temperature, 10m_u_component_of_wind, 10m_v_component_of_wind
  13 levels   geopotential_{50 ... 1000}                      (WeatherBench's 13 levels, hPa)
  17 levels   specific_humidity_, temperature_, u_component_of_wind_, v_component_of_wind_
              {10 ... 1000}                                   (the 17 standard pressure levels)
and two that the model does not take, so that a reader has something to leave out:
toa_incident_solar_radiation (time, latitude, longitude) and land_sea_mask (latitude, longitude).
The data variables are written level by level from the surface up (as a model dumps its levels),
not in ClimaX's order (variable by variable); readers find them by name. --omit leaves a variable
out (to see a reader refuse the file).

The atmosphere: a temperature falling with latitude and, at 6.5 K/km, with height up to a
tropopause, isothermal-then-warming above it, with a diurnal cycle near the surface and a
travelling zonal wave (wavenumber 4, once round the globe in 20 days) in mid-latitudes;
geopotential from the hydrostatic equation integrated in log-pressure from a surface pressure
pattern; geostrophic winds from the geopotential (Coriolis parameter held away from zero near the
equator), 10 m winds as 0.7 of the 1000 hPa wind turned 20 degrees towards low pressure; specific
humidity from a relative humidity that falls with height times the saturation value; plus
Gaussian noise (multiplicative for humidity), scaled by --noise. Deterministic for a --seed.
"""
import argparse
import sys

import numpy as np

try:
    import netCDF4
except ImportError as e:  # the driver reports it (exit 77 under ctest)
    netCDF4 = None
    _IMPORT_ERROR = e

Z_LEVELS = [50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000]
LEVELS = [10, 20, 30, 50, 70, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000]
SURFACE = ["2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind"]
UPPER = ["geopotential", "specific_humidity", "temperature", "u_component_of_wind",
         "v_component_of_wind"]
ATTRS = {  # units, ERA5 short name, long name
    "2m_temperature": ("K", "t2m", "2 metre temperature"),
    "10m_u_component_of_wind": ("m s**-1", "u10", "10 metre U wind component"),
    "10m_v_component_of_wind": ("m s**-1", "v10", "10 metre V wind component"),
    "geopotential": ("m**2 s**-2", "z", "Geopotential"),
    "specific_humidity": ("kg kg**-1", "q", "Specific humidity"),
    "temperature": ("K", "t", "Temperature"),
    "u_component_of_wind": ("m s**-1", "u", "U component of wind"),
    "v_component_of_wind": ("m s**-1", "v", "V component of wind"),
    "toa_incident_solar_radiation": ("J m**-2", "tisr", "TOA incident solar radiation"),
    "land_sea_mask": ("(0 - 1)", "lsm", "Land-sea mask"),
}
EXTRA = ["toa_incident_solar_radiation", "land_sea_mask"]

RD, G, GAMMA, OMEGA, A_EARTH = 287.05, 9.80665, 0.0065, 7.292e-5, 6.371e6


def levels_of(var):
    return Z_LEVELS if var == "geopotential" else LEVELS


def climax_order():
    """The 84 input names in ClimaX's order: surface, then variable by variable, levels from the
    top (ClimaX's default_vars)."""
    return SURFACE + [f"{v}_{p}" for v in UPPER for p in levels_of(v)]


def file_order():
    """The same 84 names as this script writes them: surface, then level by level from 1000 hPa
    up, each level's variables together."""
    names = list(SURFACE)
    for p in sorted(LEVELS, reverse=True):
        names += [f"{v}_{p}" for v in UPPER if p in levels_of(v)]
    return names


def grid(H, W):
    """Cell centres: latitudes ascending from the south (WeatherBench), longitudes from 0 east."""
    lat = -90.0 + (np.arange(H) + 0.5) * 180.0 / H
    lon = np.arange(W) * 360.0 / W
    return lat, lon


class Atmosphere:
    def __init__(self, lat, lon, hours):
        self.phi = np.deg2rad(lat)[None, :, None]                    # [1, H, 1]
        self.lam = np.deg2rad(lon)[None, None, :]                    # [1, 1, W]
        self.t = np.asarray(hours, dtype=np.float64)[:, None, None]  # [T, 1, 1]
        self.lon = lon
        mid = np.exp(-((np.abs(self.phi) - np.deg2rad(45.0)) / np.deg2rad(15.0)) ** 2)
        k, period = 4, 20 * 24.0
        phase = k * self.lam - 2 * np.pi * self.t / period
        self.wave = mid * np.cos(phase)                              # warm anomaly
        self.wave_p = mid * np.sin(phase)                            # pressure anomaly, shifted
        local_hour = np.mod(self.t + lon[None, None, :] / 15.0, 24.0)
        self.diurnal = np.cos(self.phi) * np.cos(2 * np.pi * (local_hour - 14.0) / 24.0)
        # Temperature at 1000 hPa without the diurnal cycle (K).
        self.t0 = 300.0 - 50.0 * np.sin(self.phi) ** 2 + 4.0 * self.wave
        self.ps = 1012.0 - 8.0 * np.cos(6 * self.phi) - 6.0 * self.wave_p  # hPa

    def geopotential(self, levels):
        """Hydrostatic: dz = -Rd T dln p from z(ps) = 0, trapezoid rule on a fine log-p grid."""
        out = {}
        lnp = np.log(self.ps) + 0.0 * self.t
        z = np.zeros_like(lnp)
        t_prev = self.temperature_field(np.exp(lnp))
        for p in sorted(levels, reverse=True):
            target = np.log(p)
            n = 16
            for i in range(1, n + 1):
                ln_next = lnp + (target - lnp) * i / n
                ln_here = lnp + (target - lnp) * (i - 1) / n
                t_next = self.temperature_field(np.exp(ln_next))
                z = z - RD * 0.5 * (t_prev + t_next) * (ln_next - ln_here)
                t_prev = t_next
            lnp = np.full_like(lnp, target)
            out[p] = z.copy()
        return out

    def temperature_field(self, p):
        """Temperature (K) at pressure p (hPa, a number or a field): the troposphere at 6.5 K/km,
        a stratosphere warming from 210 K at 100 hPa to 230 K at 10 hPa, and the diurnal cycle
        fading within the lowest kilometre or so."""
        tropo = self.t0 * (p / 1000.0) ** (RD * GAMMA / G)
        strat = 210.0 + 20.0 * np.maximum(0.0, np.log10(100.0 / p))
        return np.maximum(tropo, strat) + 3.0 * self.diurnal * (p / 1000.0) ** 12

    def winds(self, z):
        """Geostrophic wind of a geopotential field [T, H, W]: u = -dz/dy / f, v = dz/dx / f."""
        dphi = float(self.phi[0, 1, 0] - self.phi[0, 0, 0]) if self.phi.shape[1] > 1 else 1.0
        dlam = 2 * np.pi / z.shape[2]
        dz_dy = np.gradient(z, dphi, axis=1) / A_EARTH if z.shape[1] > 1 else 0.0 * z
        dz_dx = (np.roll(z, -1, axis=2) - np.roll(z, 1, axis=2)) / (2 * dlam)
        dz_dx = dz_dx / (A_EARTH * np.cos(self.phi))
        s = np.sin(self.phi)
        f = 2 * OMEGA * np.where(s >= 0, 1.0, -1.0) * np.maximum(np.abs(s), np.sin(np.deg2rad(15)))
        return -dz_dy / f, dz_dx / f

    @staticmethod
    def specific_humidity(temp, p):
        """Relative humidity 0.85 (p / 1000)^2 times saturation (Bolton's vapour pressure)."""
        es = 6.112 * np.exp(17.67 * (temp - 273.15) / (temp - 29.65))   # hPa
        es = np.minimum(es, 0.5 * p)
        qsat = 0.622 * es / (p - 0.378 * es)
        return 0.85 * (p / 1000.0) ** 2 * qsat

    def toa_radiation(self, step_hours):
        """Incident solar energy over the hour before each time (J m^-2), declination by day."""
        day = self.t / 24.0
        decl = np.deg2rad(23.44) * np.sin(2 * np.pi * (day - 80.0) / 365.25)
        hour_angle = 2 * np.pi * (np.mod(self.t + self.lon[None, None, :] / 15.0, 24.0) - 12) / 24
        cosz = (np.sin(self.phi) * np.sin(decl) + np.cos(self.phi) * np.cos(decl) *
                np.cos(hour_angle))
        return 1361.0 * np.maximum(cosz, 0.0) * 3600.0


def fields(H, W, hours, noise, seed):
    """{name: float64 array [T, H, W]} (land_sea_mask: [H, W]) of every variable."""
    lat, lon = grid(H, W)
    atm = Atmosphere(lat, lon, hours)
    rng = np.random.default_rng(seed)
    shape = (len(hours), H, W)
    out = {}
    z = atm.geopotential(LEVELS)  # Z_LEVELS is a subset
    temps = {p: atm.temperature_field(np.full(shape, float(p))) for p in LEVELS}
    winds = {p: atm.winds(z[p]) for p in LEVELS}
    u1000, v1000 = winds[1000]
    turn = np.deg2rad(20.0) * np.where(atm.phi >= 0, 1.0, -1.0)   # towards low pressure
    out["2m_temperature"] = atm.t0 + 5.0 * atm.diurnal
    out["10m_u_component_of_wind"] = 0.7 * (u1000 * np.cos(turn) - v1000 * np.sin(turn))
    out["10m_v_component_of_wind"] = 0.7 * (u1000 * np.sin(turn) + v1000 * np.cos(turn))
    for p in Z_LEVELS:
        out[f"geopotential_{p}"] = z[p]
    for p in LEVELS:
        out[f"temperature_{p}"] = temps[p]
        out[f"u_component_of_wind_{p}"], out[f"v_component_of_wind_{p}"] = winds[p]
        out[f"specific_humidity_{p}"] = atm.specific_humidity(temps[p], float(p))
    scale = {"temperature": 0.3, "2m_temperature": 0.5, "geopotential": 20.0,
             "u_component": 0.5, "v_component": 0.5, "10m": 0.3}
    for name in climax_order():  # a fixed order: the noise does not depend on the file order
        a = np.broadcast_to(out[name], shape).copy()
        if name.startswith("specific_humidity"):
            a *= np.exp(0.02 * noise * rng.standard_normal(shape))
        else:
            key = next(k for k in scale if name.startswith(k))
            a += scale[key] * noise * rng.standard_normal(shape)
        out[name] = a
    out["toa_incident_solar_radiation"] = np.broadcast_to(atm.toa_radiation(6), shape)
    lam, phi = np.meshgrid(np.deg2rad(lon), np.deg2rad(lat))
    out["land_sea_mask"] = (np.sin(2 * lam) * np.cos(phi) + 0.3 * np.sin(5 * phi) > 0.2) * 1.0
    return out


def write(path, H, W, hours, data, omit):
    lat, lon = grid(H, W)
    with netCDF4.Dataset(path, "w", format="NETCDF4") as nc:
        nc.title = "ERA5-like analytic atmosphere (dchag weather example)"
        nc.Conventions = "CF-1.6"
        nc.history = "written by examples/weather/make_era5.py " + " ".join(sys.argv[1:])
        nc.createDimension("time", None)
        nc.createDimension("latitude", H)
        nc.createDimension("longitude", W)
        t = nc.createVariable("time", "f8", ("time",))
        t.units, t.calendar = "hours since 1979-01-01 00:00:00", "gregorian"
        t[:] = hours
        la = nc.createVariable("latitude", "f4", ("latitude",))
        la.units, la.long_name = "degrees_north", "latitude"
        la[:] = lat
        lo = nc.createVariable("longitude", "f4", ("longitude",))
        lo.units, lo.long_name = "degrees_east", "longitude"
        lo[:] = lon
        for name in file_order() + EXTRA:
            if name in omit:
                continue
            base = name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name
            units, short, long_name = ATTRS[base]
            dims = ("latitude", "longitude") if name == "land_sea_mask" else \
                ("time", "latitude", "longitude")
            v = nc.createVariable(name, "f4", dims)
            v.units, v.short_name = units, short
            if base != name:
                v.long_name = f"{long_name} at {name.rsplit('_', 1)[1]} hPa"
                v.pressure_level = np.int32(name.rsplit("_", 1)[1])
            else:
                v.long_name = long_name
            v[:] = data[name].astype(np.float32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", help="NetCDF file to write")
    ap.add_argument("--lat", type=int, default=32, help="latitudes H (default 32, 5.625 degrees)")
    ap.add_argument("--lon", type=int, default=64, help="longitudes W (default 64)")
    ap.add_argument("--times", type=int, default=4, help="time steps (default 4)")
    ap.add_argument("--step-hours", type=float, default=6.0, help="hours between times")
    ap.add_argument("--start-hour", type=float, default=0.0, help="hours since 1979-01-01")
    ap.add_argument("--noise", type=float, default=1.0, help="noise scale (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--omit", action="append", default=[], metavar="NAME",
                    help="leave this variable out (repeatable)")
    a = ap.parse_args(argv)
    for name in ("lat", "lon", "times"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} is {getattr(a, name)}, expected >= 1")
    if a.step_hours <= 0:
        ap.error(f"--step-hours is {a.step_hours}, expected > 0")
    if a.noise < 0:
        ap.error(f"--noise is {a.noise}, expected >= 0")
    for name in a.omit:
        if name not in file_order() + EXTRA:
            ap.error(f"--omit {name}: expected one of the variables written (see --help)")
    if netCDF4 is None:
        print(f"make_era5.py: cannot import netCDF4 ({_IMPORT_ERROR}); Debian: python3-netcdf4 "
              "(scripts/install-deps.sh)", file=sys.stderr)
        return 77
    hours = a.start_hour + a.step_hours * np.arange(a.times)
    data = fields(a.lat, a.lon, hours, a.noise, a.seed)
    write(a.output, a.lat, a.lon, hours, data, set(a.omit))
    kept = [n for n in file_order() + EXTRA if n not in a.omit]
    print(f"wrote {a.output}: {len(kept)} variables on {a.lat}x{a.lon}, {a.times} times every "
          f"{a.step_hours:g} h" + (f", without {', '.join(a.omit)}" if a.omit else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
