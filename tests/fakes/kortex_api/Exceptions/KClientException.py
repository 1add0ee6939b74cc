"""Double of kortex_api.Exceptions.KClientException (errors raised on the client side: decoding, transport)."""


class KClientException(Exception):
    def __init__(self, error_code, message):
        super().__init__(f"Client error name={error_code} => {message}")
        self.error_code = error_code

    def get_error_code(self):
        return self.error_code
